"""The runner: the only package train.py imports.

    main(cfg)     validate -> resume plan -> Session -> ContinualLoop | EpisodicLoop
    Session       the job's identity, its device, results record, logger, stop signals
    Evaluator     the one evaluation loop (accuracy rows, validation loss, episodes)
    RunRecord     results.json and its schema

train.py imports `metacl.runner.main.main`; nothing here is imported eagerly, so that the
lower floors (validate, schedule) can use a runner module without importing the whole runner.
"""
