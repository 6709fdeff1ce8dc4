from metacl.resolvers import register as _register_resolvers

_register_resolvers()  # ${metacl.run_dir:...} in conf/hydra/default.yaml
