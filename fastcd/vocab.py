"""Each vocabulary of fastcd once (torch-free): the config's field choices, the CLI's choices, the experiment's
fields and every check read these."""

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
CKA_ESTIMATORS = ("biased", "unbiased")
MATCHING_METHODS = ("ablation", "cka", "combined")  # how distill() and the experiment match heads
MATCH_METHODS = (*MATCHING_METHODS, "random")  # fastcd match, with the random control
DISCOVERY_METHODS = ("roles", "patching", "attribution", "path")
EXPERIMENT_DISCOVERY = ("attribution", "roles", "auto")  # what an experiment config's `discovery` may name
KV_POLICIES = ("auto", "frozen", "trainable")
LABELS = ("teacher", "gold")
ON_NONFINITE = ("stop", "skip")
REPORT_TO = ("none", "tensorboard")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies for device_map
