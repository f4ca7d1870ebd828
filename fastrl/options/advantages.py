"""The choices of `fastrl.group_advantages`, which `GRPOConfig` and the command line offer
under TRL's names (`scale_rewards`, `multi_objective_aggregation`)."""

#: the baseline subtracted within a group: GRPO's mean, or RLOO's leave-one-out mean
BASELINES = ("mean", "rloo")
#: what the advantages are divided by: the group's std, the batch's std, or nothing
SCALES = ("group", "batch", "none")
#: how several reward functions combine (TRL's `multi_objective_aggregation`)
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

# the defaults of `group_advantages` (and of its oracle and GRPOConfig): TRL's
BASELINE = "mean"
SCALE = "group"
AGGREGATION = "sum_then_normalize"
EPS = 1e-4
