"""Where the components find the code and files they deploy, in a checkout and in an installed package alike.

The broker archive, the config-push function's zip and the pipeline's Flex Template image are built from files
laid out as in the repository: ``iotbridge/``, ``dataflow_jobs/``, ``functions/config_push/``, ``requirements/``.
``gcp_iot_bridge/_sources`` holds that layout. In a checkout its entries are symbolic links to the repository's
folders, so ``SOURCE_ROOT`` is the repository root (the image's build context and every content hash stay what
they were). An installed wheel carries the same files as package data (``[tool.setuptools.package-data]`` in
pyproject.toml), and ``SOURCE_ROOT`` is ``gcp_iot_bridge/_sources`` inside the installation.
"""

from __future__ import annotations

from pathlib import Path

_SOURCES = Path(__file__).resolve().parents[1] / "_sources"
# Resolving one entry follows the checkout's link back to the repository; in a wheel it is a plain folder.
SOURCE_ROOT: Path = (_SOURCES / "requirements").resolve().parent
