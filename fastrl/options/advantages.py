"""The choices of `fastrl.group_advantages`, which `GRPOConfig` and the command line offer
under TRL's names (`scale_rewards`, `multi_objective_aggregation`), and the defaults of
the per-token estimators (`gae_advantages`, `reinforce_plus_plus_advantages`)."""

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

# the defaults of the per-token estimators (gae_advantages, reinforce_plus_plus_advantages):
# OpenRLHF's and verl's (gamma = lambda = 1: undiscounted, Monte-Carlo GAE)
GAMMA = 1.0
LAM = 1.0
#: REINFORCE++'s baselines: none (REINFORCE++), the group mean (REINFORCE++-baseline)
REINFORCE_BASELINES = ("none", "mean")
#: OpenRLHF's floor on the variance when whitening advantages over the batch
WHITEN_EPS = 1e-8
