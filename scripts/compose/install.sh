#!/bin/sh
# Install steps of scripts/compose/Dockerfile, also run by tests/test_compose.py in a fresh venv.
#   install.sh deps VENV      the dependencies listed in ./pyproject.toml (a cached image layer)
#   install.sh package VENV   this package from the current directory, without dependencies
set -eu
step=$1 venv=$2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
case $step in
  deps)
    "$venv/bin/python" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/shadowlens-requirements.txt
    "$venv/bin/pip" install ${PIP_FLAGS:-} -r /tmp/shadowlens-requirements.txt ;;
  package)
    "$venv/bin/pip" install ${PIP_FLAGS:-} --no-deps . ;;
  *) echo "install.sh: unknown step $step (deps | package)" >&2; exit 2 ;;
esac
