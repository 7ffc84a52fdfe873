"""Pure functions and single modules: job files, samplers, prompt weights, the store, the
scheduler, the architecture rules, the plugin API."""
