"""Rolling-element bearing kinematics: the characteristic fault frequencies from the bearing geometry.

For a bearing with ``n_balls`` balls of diameter d on pitch diameter D, contact angle phi and shaft rate f_r
(outer race fixed, inner race turning with the shaft):

  BPFO = (n/2) (1 - (d/D) cos phi) f_r        ball pass, outer race
  BPFI = (n/2) (1 + (d/D) cos phi) f_r        ball pass, inner race
  FTF  = (1/2) (1 - (d/D) cos phi) f_r        cage (fundamental train)
  BSF  = (D/2d) (1 - ((d/D) cos phi)^2) f_r   ball spin

A defect on a ball strikes the races twice per spin revolution, so its impulse rate is 2 BSF (the CWRU tables
list this 2 BSF as "BSF": 4.7135 f_r for the drive-end 6205).
"""

from __future__ import annotations

import dataclasses
import math

# Class order used everywhere in sqattn.science.bearing (labels 0..3).
CLASSES = ("normal", "inner", "outer", "ball")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Bearing geometry (lengths in any one unit).

    Attributes:
      ball_diameter: d.
      pitch_diameter: D.
      n_balls: number of rolling elements.
      contact_angle_deg: phi (0 for a deep-groove ball bearing under radial load).
    """

    ball_diameter: float
    pitch_diameter: float
    n_balls: int
    contact_angle_deg: float = 0.0

    def __post_init__(self):
        if not 0 < self.ball_diameter < self.pitch_diameter:
            raise ValueError(f"need 0 < ball_diameter < pitch_diameter, got {self.ball_diameter}, "
                             f"{self.pitch_diameter}")
        if self.n_balls < 1:
            raise ValueError(f"n_balls must be >= 1, got {self.n_balls}")


# CWRU drive-end bearing SKF 6205-2RS JEM (inches).
CWRU_DRIVE_END = Geometry(ball_diameter=0.3126, pitch_diameter=1.537, n_balls=9)


def multipliers(geometry: Geometry = CWRU_DRIVE_END) -> dict[str, float]:
    """Fault frequencies as multiples of the shaft rate: {"bpfo", "bpfi", "ftf", "bsf", "two_bsf"}."""
    r = geometry.ball_diameter / geometry.pitch_diameter * math.cos(math.radians(geometry.contact_angle_deg))
    n = geometry.n_balls
    bsf = geometry.pitch_diameter / (2 * geometry.ball_diameter) * (1 - r * r)
    return {"bpfo": n / 2 * (1 - r), "bpfi": n / 2 * (1 + r), "ftf": (1 - r) / 2, "bsf": bsf, "two_bsf": 2 * bsf}


def fault_frequencies(shaft_hz: float, geometry: Geometry = CWRU_DRIVE_END) -> dict[str, float]:
    """The characteristic frequencies (Hz) at shaft rate ``shaft_hz``; keys as in ``multipliers``."""
    return {k: v * shaft_hz for k, v in multipliers(geometry).items()}


def impulse_multiplier(fault: str, geometry: Geometry = CWRU_DRIVE_END) -> float:
    """Impulse rate of a fault class in multiples of the shaft rate (inner BPFI, outer BPFO, ball 2 BSF)."""
    m = multipliers(geometry)
    table = {"inner": m["bpfi"], "outer": m["bpfo"], "ball": m["two_bsf"]}
    if fault not in table:
        raise ValueError(f"no impulse rate for class {fault!r}; faults are {sorted(table)}")
    return table[fault]
