"""Helpers every sandbox VM has at /opt/sandbox (staged by extraFiles, on PYTHONPATH)."""
import json
import sys


def describe():
    return f"python {sys.version.split()[0]}, sandbox_tools ready"


def result(value):
    """Prints a value as the one JSON line the host reads back."""
    print(json.dumps({"result": value}))
