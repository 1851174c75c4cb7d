"""A candidate's loss: :class:`~kd_optuna.distill.loss.DistillerLoss` built from a spec over the
ops of :mod:`kd_optuna.ops`, the published distillers written as specs (``classics``) and the
hand-made methods that are not specs (``baselines``)."""
