#!/usr/bin/env bash
# Builds confseq (Howard et al.'s reference implementation of confidence-sequence boundaries, C++ with
# Boost.Math) into .cache/confseq, for the cross-check in tests/test_sequential_confseq.py.
#
# Why a script and not a test extra: confseq 0.0.11 pins pybind11 2.6 for its isolated build, which does
# not compile on Python 3.11. Built without isolation against the venv's newer pybind11 it compiles fine.
# Boost.Math is header-only: the machine's /usr/include/boost is used when present; otherwise Debian's
# libboost*-dev package is downloaded and unpacked into .cache (no root, nothing installed system-wide).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.cache/confseq
if ls "$DEST"/confseq/boundaries*.so >/dev/null 2>&1; then exit 0; fi
command -v cmake >/dev/null || { echo "confseq.sh: cmake not found; fix: install cmake (apt-get install cmake)" >&2; exit 1; }
if [ ! -d /usr/include/boost/math ] || [ -n "${CONFSEQ_DOWNLOAD_BOOST:-}" ]; then
  pkg=$(apt-cache depends libboost-dev | awk '/Depends: libboost[0-9.]*-dev/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "confseq.sh: no libboost*-dev package known to apt; fix: apt-get update, or install Boost headers" >&2; exit 1; }
  rm -rf .cache/boost && mkdir -p .cache/boost && chmod 777 .cache/boost  # apt drops to _apt to download
  (cd .cache/boost && apt-get download -qq "$pkg" >/dev/null && dpkg-deb -x ./*.deb root)
  export CPATH="$PWD/.cache/boost/root/usr/include${CPATH:+:$CPATH}"
  export BOOST_ROOT="$PWD/.cache/boost/root/usr"
fi
"$PY" -m pip install -q 'pybind11>=2.10' 'scikit-build>=0.17' setuptools wheel
rm -rf "$DEST" .cache/confseq-build && mkdir -p .cache
"$PY" -m pip install -q --no-build-isolation --no-deps --no-cache-dir --target "$DEST" confseq==0.0.11
ls "$DEST"/confseq/boundaries*.so >/dev/null
