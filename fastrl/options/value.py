"""The options of `fastrl.value_loss` (PPO's clipped value loss, OpenRLHF's ``ValueLoss``)."""

#: None: no clipping (OpenRLHF's ``ValueLoss(clip_eps=None)``; its CLI and verl use 0.5,
#: TRL's PPOConfig 0.2)
VALUE_CLIP = None
#: True: the masked mean over tokens; False: the mean over sequences of their token means
TOKEN_LEVEL_LOSS = True
