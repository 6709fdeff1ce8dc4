"""Few-shot meta-learning: episodes instead of a task stream (metacl.runner.episodic).

Methods (one file each, all ``metacl.fewshot.base.MetaLearner``): ``maml.MAML`` (second or
first order), ``meta_sgd.MetaSGD``, ``anil.ANIL``, ``protonet.ProtoNet``, and the
pretrain-then-finetune baseline ``baseline.PretrainFinetune``. See docs/fewshot.md.
"""
