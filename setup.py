"""Only here to ship ``inseq_semiring_autoload.pth`` at the top of site-packages (all metadata is in pyproject.toml).

The .pth holds one line, ``import inseq_semiring_autoload``; Python's ``site`` runs it at start-up and the shim installs
an import hook that registers the plugin with Inseq's CLI (see inseq_semiring/integrations/_autoload.py). A .pth
must sit at the root of site-packages, which setuptools has no declarative option for, hence this build_py.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "inseq_semiring_autoload.pth"
PTH_TEXT = "import inseq_semiring_autoload\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # editable wheels drop build_lib; what lands in the install command's install_lib is the wheel's root
            dest = self.get_finalized_command("install").install_lib
        else:
            dest = self.build_lib
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, PTH_NAME), "w", encoding="utf-8") as fh:
            fh.write(PTH_TEXT)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
