"""Diffusion in sqattn: noise schedules, the eps-prediction loss, a DDIM sampler with classifier-free guidance
(one ``lax.scan``), and the trainer tasks of the SPM reproduction (``tasks.py``: diffusion, judge, SPM erasing).
"""

from sqattn.diffusion.sampler import cfg_eps, ddim_rollout, ddim_sample, ddim_step, ddim_timesteps  # noqa: F401
from sqattn.diffusion.schedule import (Schedule, add_noise, cosine_schedule, eps_loss,  # noqa: F401
                                       linear_schedule)
