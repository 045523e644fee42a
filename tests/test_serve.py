"""`qlora-nb serve` end to end: real server processes on the tiny model with two adapters, the openai client, streaming,
mixed-adapter batching, bad input, overload, the cache (in process and in a real redis-server), and the SIGTERM drain."""
import json, os, shutil, signal, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from qlora_nb.serve.cache import free_port, local_redis
from qlora_nb.testing import fake_run

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
START_TIMEOUT = 90  # seconds for a server to load on a busy 2-core machine


class Server:
    "A `python -m qlora_nb.serve.app` process on a free port, stopped (SIGKILL if it must) when the test ends."
    def __init__(self, *args:str, log:Path):
        self.port, self.log_path = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "qlora_nb.serve.app", *args, "--port", str(self.port)],
                                        cwd=REPO, env=ENV, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None: raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200: return self
            except httpx.TransportError: pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not become ready in {START_TIMEOUT} s: {self.log_path.read_text()}")

    def metric(self, name:str, **labels) -> float:
        "The value of one sample of /metrics (0 when absent)."
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(want + " "): return float(line.split()[-1])
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try: self.process.wait(timeout=20)
            except subprocess.TimeoutExpired: self.process.kill(); self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Two runs on the tiny model with different random adapters."
    folder = tmp_path_factory.mktemp("serve_runs")
    return [fake_run(folder / "alpha", seed=1), fake_run(folder / "beta", seed=2)]


@pytest.fixture(scope="module")
def redis_url():
    "A real redis-server on a free port for this module, or None (the Redis tests skip, saying why)."
    if shutil.which("redis-server") is None:
        yield None
        return
    with local_redis() as url: yield url


@pytest.fixture(scope="module")
def server(runs, redis_url, tmp_path_factory):
    "The main server: both adapters, batches of 4, a queue of 2, its cache in Redis when there is one."
    cache = ["--cache", redis_url] if redis_url else []
    s = Server(*map(str, runs), "--max-batch", "4", "--max-queue", "2", "--max-tokens-cap", "500", *cache,
               log=tmp_path_factory.mktemp("serve_logs") / "main.log")
    yield s.wait_ready()
    s.stop()


def openai_client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, path:str, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


def test_openai_client(server):
    client = openai_client(server)
    assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]
    completion = client.completions.create(model="alpha", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens == 8 or completion.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # streamed or not, greedy gives the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="alpha", prompt="The capital of France is",
                                                                            max_tokens=8, temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    from openai import NotFoundError
    with pytest.raises(NotFoundError, match="not served here"): client.completions.create(model="gamma", prompt="Hi", max_tokens=2)


def test_mixed_adapters_equal_single_requests(server):
    "Greedy answers for three models (base and two adapters) are the same alone and in one mixed batch."
    jobs = [(model, prompt) for model in ("tiny", "alpha", "beta") for prompt in ("Once upon a time", "Convert 3 km to meters.")]
    def ask(job):
        body = {"model": job[0], "prompt": job[1], "max_tokens": 12, "temperature": 0}
        response = post(server, "/v1/completions", body, headers={"Cache-Control": "no-cache"})  # generated, not cached
        assert response.headers["x-cache"] == "bypass"
        return response.json()["choices"][0]["text"]
    alone = [ask(job) for job in jobs]
    assert len(set(alone)) > 2  # the adapters change the answers
    before = server.metric("qlora_nb_batch_size_sum")
    with ThreadPoolExecutor(len(jobs)) as pool: together = list(pool.map(ask, jobs))
    assert together == alone
    assert server.metric("qlora_nb_batch_size_sum") > before


def error(response:httpx.Response) -> tuple:
    return response.status_code, response.json()["error"]["param"], response.json()["error"]["message"]


def test_bad_input(server):
    status, param, message = error(httpx.post(server.url + "/v1/completions", content=b'{"model": "alpha", "prompt": ',
                                              headers={"content-type": "application/json"}, timeout=10))
    assert (status, param) == (422, "body") and "not valid JSON" in message
    assert error(post(server, "/v1/completions", {"model": "alpha", "prompt": "Hi", "top_p": 2}))[:2] == (422, "top_p")
    assert error(post(server, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot", "content": "Hi"}]}))[:2] == (422, "messages.0.role")
    assert error(post(server, "/v1/completions", {"model": "alpha", "prompt": "Hi", "n": 3}))[:2] == (422, "n")
    assert error(post(server, "/v1/completions", {"model": "alpha"}))[:2] == (422, "prompt")
    status, param, message = error(post(server, "/v1/completions", {"model": "gamma", "prompt": "Hi"}))
    assert (status, param) == (404, "model") and "the models are: tiny, alpha, beta" in message
    status, param, message = error(post(server, "/v1/completions", {"model": "alpha", "prompt": list(range(3, 603))}))
    assert (status, param) == (400, "prompt") and "the prompt has 600 tokens but the context of 'alpha' is 512 tokens" in message
    status, param, message = error(post(server, "/v1/completions", {"model": "alpha", "prompt": "Hi", "max_tokens": 9999}))
    assert (status, param) == (400, "max_tokens") and "above this server's cap of 500" in message
    garbage = [b"", b"null", b"[]", b'"text"', b"{}", b'{"model": 5, "prompt": {}}', b'{"model": "alpha", "prompt": [-1]}',
               b'{"model": "alpha", "prompt": "Hi", "max_tokens": 1e400}', b'{"model": "alpha", "prompt": "\\ud800"}', b"\xff\xfe",
               json.dumps({"model": "alpha", "prompt": "Hi", "stop": ["a"] * 9}).encode(), b'{"model": "alpha", "prompt": ""}']
    for body in garbage:
        response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=10)
        assert 400 <= response.status_code < 500 and "error" in response.json(), (body, response.status_code, response.text)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200 and server.process.poll() is None  # never dies on input


def test_overload_gives_200_or_429_exactly_once(server):
    "24 concurrent clients against 4 batch rows and a queue of 2: each gets one answer, 200 or 429, none lost."
    before = {status: server.metric("qlora_nb_requests_total", endpoint="/v1/completions", model="beta", status=status) for status in ("200", "429")}
    def ask(i):
        return post(server, "/v1/completions", {"model": "beta", "prompt": f"Request number {i}", "max_tokens": 24, "temperature": 0.8})
    with ThreadPoolExecutor(24) as pool: responses = list(pool.map(ask, range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
    ids = [r.json()["id"] for r in responses if r.status_code == 200]
    assert len(ids) == len(set(ids))  # no answer given twice
    after = {status: server.metric("qlora_nb_requests_total", endpoint="/v1/completions", model="beta", status=status) for status in ("200", "429")}
    assert (after["200"] - before["200"], after["429"] - before["429"]) == (statuses.count(200), statuses.count(429))
    assert server.metric("qlora_nb_running") == 0 and server.metric("qlora_nb_queue_depth") == 0


def test_cache_hit(server):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Cache me"}], "max_tokens": 10, "temperature": 0}
    hits = server.metric("qlora_nb_cache_hits_total", model="alpha")
    first, second = post(server, "/v1/chat/completions", body), post(server, "/v1/chat/completions", body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"] and second.json()["usage"] == first.json()["usage"]
    assert server.metric("qlora_nb_cache_hits_total", model="alpha") == hits + 1
    assert post(server, "/v1/chat/completions", {**body, "temperature": 0.7}).headers["x-cache"] == "off"  # not deterministic


def test_disconnect_frees_the_slot(server):
    "A client that goes away mid-stream cancels its request: the engine stops generating for it."
    tokens = server.metric("qlora_nb_engine_tokens_generated")
    body = {"model": "alpha", "prompt": "Tell a long story", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while server.metric("qlora_nb_running") and time.monotonic() < deadline: time.sleep(0.05)
    assert server.metric("qlora_nb_running") == 0
    assert server.metric("qlora_nb_engine_tokens_generated") - tokens < 480


def test_redis_cache_shared_between_servers_with_ttl(server, runs, redis_url, tmp_path):
    if redis_url is None: pytest.skip("redis-server is not installed (run `make redis`)")
    body = {"model": "beta", "prompt": "Shared between servers", "max_tokens": 8, "temperature": 0}
    first = post(server, "/v1/completions", body)
    assert first.headers["x-cache"] == "miss"
    other = Server(*map(str, runs), "--cache", redis_url, "--cache-ttl", "1", log=tmp_path / "other.log").wait_ready()  # started after the write
    try:
        shared = post(other, "/v1/completions", body)
        assert shared.headers["x-cache"] == "hit" and shared.json()["choices"] == first.json()["choices"]
        short = {**body, "prompt": "Kept for one second"}
        assert post(other, "/v1/completions", short).headers["x-cache"] == "miss"  # written with a 1 s TTL
        assert post(server, "/v1/completions", short).headers["x-cache"] == "hit"
        time.sleep(1.5)
        assert post(server, "/v1/completions", short).headers["x-cache"] == "miss"  # expired
    finally: other.stop()


@pytest.fixture(scope="module")
def local(runs, one_thread):
    "The app in this process (FastAPI's TestClient) with one batch row, for the settings a test changes; its load is held back first."
    from fastapi.testclient import TestClient
    from qlora_nb.serve.app import ServeSettings, create_app
    from qlora_nb.serve.engine import Engine
    settings, release = ServeSettings(max_batch=1, max_queue=4, max_tokens_cap=100), threading.Event()
    def load():
        release.wait(30)
        return Engine("tiny", {"alpha": runs[0]}, max_batch=1)
    app = create_app(load, settings)
    with TestClient(app) as client:
        loading = client.get("/health"), client.get("/v1/models")
        release.set()
        deadline = time.monotonic() + START_TIMEOUT
        while client.get("/health").status_code != 200 and time.monotonic() < deadline: time.sleep(0.05)
        yield client, settings, app.state.serve, loading


def test_health_is_503_while_loading(local):
    client, _, _, (health, models) = local
    assert (health.status_code, health.json()["status"]) == (503, "loading")
    assert models.status_code == 503 and models.headers["retry-after"] == "5" and "still loading" in models.json()["error"]["message"]
    assert client.get("/health").json() == {"status": "ok", "models": ["tiny", "alpha"]}


def test_api_key(local):
    client, settings, _, _ = local
    settings.api_key = "s3cret"
    try:
        body = {"model": "alpha", "prompt": "Hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key
    finally: settings.api_key = None


def test_max_tokens_clamped_and_said(local):
    client, settings, _, _ = local
    settings.clamp = True
    try:
        response = client.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 1000, "temperature": 0})
        assert response.status_code == 200 and response.headers["x-max-tokens-clamped"] == "1000 -> 100"
        assert response.json()["usage"]["completion_tokens"] <= 100
    finally: settings.clamp = False


def test_ignore_eos_runs_to_max_tokens(local):
    "vLLM's `ignore_eos`: with every token made an end-of-sequence token, a request stops at once, unless it ignores EOS."
    client, _, state, _ = local
    engine = state.engine
    eos_ids, engine.eos_ids = engine.eos_ids, set(range(engine.vocab_size))
    try:
        for endpoint, body in [("/v1/completions", {"prompt": "Count on"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count on"}]})]:
            body = {**body, "model": "alpha", "max_tokens": 7, "temperature": 0}
            stopped = client.post(endpoint, json=body).json()
            assert (stopped["choices"][0]["finish_reason"], stopped["usage"]["completion_tokens"]) == ("stop", 1), stopped
            ignoring = client.post(endpoint, json={**body, "ignore_eos": True})
            assert ignoring.headers["x-cache"] == "miss"  # another answer, so another cache key
            answer = ignoring.json()
            assert (answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]) == ("length", 7), answer
    finally: engine.eos_ids = eos_ids


def test_deadline_gives_504_and_frees_the_queue(local):
    "With the only batch row taken by a stream, a request waiting past --timeout gets 504 and leaves the queue."
    client, settings, state, _ = local
    settings.timeout = 0.3
    try:
        long = threading.Thread(target=lambda: client.post("/v1/completions", json={"model": "alpha", "prompt": "Go on", "max_tokens": 100,
                                                                                   "temperature": 0, "stream": True}))
        long.start()
        deadline = time.monotonic() + 10
        while state.engine.stats["running"] == 0 and time.monotonic() < deadline: time.sleep(0.01)
        late = client.post("/v1/completions", json={"model": "alpha", "prompt": "Me too", "max_tokens": 4, "temperature": 0})
        assert late.status_code == 504 and "timeout of 0.3 s" in late.json()["error"]["message"]
        long.join(120)
    finally: settings.timeout = 60.0
    settled = lambda: state.active == 0 and state.engine.stats["waiting"] == 0 and state.engine.stats["running"] == 0
    deadline = time.monotonic() + 60  # the engine retires the stream at its next step, later on a loaded machine
    while not settled() and time.monotonic() < deadline: time.sleep(0.05)
    assert not long.is_alive() and settled(), (state.active, state.engine.stats)
    assert 'qlora_nb_rejected_total{reason="deadline"} 1.0' in client.get("/metrics").text


def serve_error(capsys, *argv) -> str:
    from qlora_nb.serve.app import serve_main
    assert serve_main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-nb serve: error: "), lines
    return lines[0]


def test_cli_refuses_bad_arguments(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QLORA_NB_API_KEY", raising=False)
    assert "--host 0.0.0.0 is not a loopback address" in serve_error(capsys, runs[0], "--host", "0.0.0.0")
    assert "has no adapter_config.json" in serve_error(capsys, tmp_path)
    assert "is not a directory" in serve_error(capsys, tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(runs[0] / "adapter" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    assert "safetensors only" in serve_error(capsys, "--adapter", f"p={pickled}")
    other = fake_run(tmp_path / "other", blocksize=128)
    assert "trained on different bases" in serve_error(capsys, runs[0], other)
    assert "--timeout=0.0 is out of range" in serve_error(capsys, runs[0], "--timeout", "0")
    assert "invalid int value" in serve_error(capsys, runs[0], "--max-batch", "many")
    assert "--prefill-tokens=0 is out of range: allowed [1, inf)" in serve_error(capsys, runs[0], "--prefill-tokens", "0")
    assert "invalid int value" in serve_error(capsys, runs[0], "--prefill-tokens", "none")


def test_cli_passes_the_prefill_budget_to_the_engine(runs, monkeypatch):
    "`--prefill-tokens N` reaches the engine `serve_main` builds: its scheduler admits at most N prompt tokens a step."
    from qlora_nb.serve import app as serve_app
    factories = []
    real_create_app = serve_app.create_app
    monkeypatch.setattr(serve_app, "create_app", lambda engine, *args: factories.append(engine) or real_create_app(engine, *args))
    class NoServer:  # stands in for uvicorn: serve_main returns instead of serving
        def __init__(self, config, state): pass
        def run(self): pass
    monkeypatch.setattr(serve_app, "DrainingServer", NoServer)
    assert serve_app.serve_main([str(runs[0]), "--max-batch", "3", "--prefill-tokens", "7"]) == 0
    engine = factories[-1]()  # the function the server would call at startup
    assert (engine.max_batch, engine.scheduler.prefill_tokens) == (3, 7)


def test_sigterm_drains_then_exits_0(server):
    "Last: SIGTERM while a stream runs: new requests get 503, the stream completes, the process exits with 0."
    body = {"model": "beta", "prompt": "Keep going", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        first = next(lines)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = post(server, "/v1/completions", {"model": "beta", "prompt": "Too late", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        rest = [first, *lines]
    events = [line.removeprefix("data: ") for line in rest if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    assert server.process.wait(timeout=30) == 0
