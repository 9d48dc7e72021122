"""Tasks the bench's workers run: one module per scenario, all ``shared_task`` so
they bind to whichever app a cell builds. Names are ``bench.<what>``."""
import importlib
import pkgutil

# Import every module here so `include=["bench.tasks"]` registers them all.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
