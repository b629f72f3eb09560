"""Python runs this file at interpreter start-up when its folder is on ``PYTHONPATH``.

``sawyer.netguard.child_environment()`` puts the folder there for notebook kernels and other Python child
processes, so the offline guard is on before their first line of code (a notebook cell that runs before
``import sawyer`` included). Only one ``sitecustomize`` is ever imported, so this one then runs the next
``sitecustomize`` on ``sys.path``, if any (a distribution's own), instead of hiding it.
"""
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("SAWYER_NETGUARD") == "1":
    try:
        from sawyer import netguard as _netguard
    except ImportError:  # an interpreter without sawyer installed: load the module from its file
        _spec = importlib.util.spec_from_file_location("sawyer_netguard", os.path.join(_HERE, "..", "netguard.py"))
        _netguard = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_netguard)
    _netguard.install()

_others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.origin and os.path.abspath(_spec.origin) != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
