"""Registers effx's lm-evaluation-harness model (``lm_eval --model effx``) when lm-eval loads its models.

lm-eval 0.4 discovers no models outside its own package, so effx's install puts this module and
``effx-lm-eval.pth`` (one line: ``import _effx_lm_eval``) into site-packages. At start-up it adds one
finder to ``sys.meta_path`` and imports nothing else; when a program imports ``lm_eval.models`` (lm-eval's
registry of built-in models), the finder lets that module load as usual and then registers ``effx`` as a
lazy entry, ``effx.harness:EffxLM``, which is imported only when ``--model effx`` is asked for.
"""

import sys


class _RegisterEffx:
    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # once; and so that the lookup below finds the real module
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            from lm_eval.api.registry import model_registry

            if "effx" not in model_registry:
                model_registry.register("effx", target="effx.harness:EffxLM")

        spec.loader.exec_module = exec_module
        return spec


if not any(type(f).__name__ == "_RegisterEffx" for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterEffx())
