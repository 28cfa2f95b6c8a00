"""setuptools hook: everything else is in pyproject.toml.

It puts the lm-eval start-up hook (hook/effx-lm-eval.pth and hook/_effx_lm_eval.py) at the top of
site-packages, in wheels and in editable installs alike, so that ``lm_eval --model effx`` finds effx's
model (lm-eval 0.4 has no plugin discovery for models; see effx/harness.py).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = ("effx-lm-eval.pth", "_effx_lm_eval.py")


class BuildPy(build_py):
    def run(self):
        super().run()
        # an editable install builds into a throw-away folder and ships only what install_lib holds
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        for name in HOOK:
            self.copy_file(os.path.join("hook", name), os.path.join(target, name))


setup(cmdclass={"build_py": BuildPy})
