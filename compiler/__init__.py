"""The spec compiler: YAML conversion specs in, importable converter modules out.

`load_spec` reads and validates a spec; `render_module` turns it into Python source.
Nothing here is imported by the runtime or by generated modules.
"""

from shardsync.compiler.errors import SpecError
from shardsync.compiler.render import render_index, render_kinds, render_module
from shardsync.compiler.spec import Spec, load_spec

__all__ = ["Spec", "SpecError", "load_spec", "render_index", "render_kinds", "render_module"]
