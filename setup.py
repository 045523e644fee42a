"""Packaging for qlora_nb: every field comes from settings.ini, the nbdev 2 project file."""
from configparser import ConfigParser
import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
license_name, license_classifier = licenses[cfg["license"]]


def split_requirements(key):
    "The space-separated requirements under `key`, as a list."
    return cfg.get(key, "").split()


console_scripts = [s for s in cfg.get("console_scripts", "").split() if s]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license=license_name,
    keywords=cfg["keywords"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"],
        "License :: " + license_classifier,
        "Natural Language :: " + cfg["language"],
        "Programming Language :: Python :: 3.11",
    ],
    packages=setuptools.find_packages(include=["qlora_nb", "qlora_nb.*"]),
    include_package_data=True,
    python_requires=">=" + cfg["min_python"],
    install_requires=split_requirements("requirements"),
    extras_require={"dev": split_requirements("dev_requirements")},
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
