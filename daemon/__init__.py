"""lorafarm's core: config, store, intake, model registry, scheduler, worker, outputs, CLI.

Plugins mark their hook implementations with `daemon.hookimpl`.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("lorafarm")

__version__ = "0.1.0"
