"""The contract between the core and its plugins: the Family base class, the hooks, the render
specs, the job-file schema, the plugin loader that isolates each plugin, and the render helpers
a family may call (samplers, prompt weighting, hires fix, ONNX models). Plugins import all of it
through daemon.plugin_api only.
"""
