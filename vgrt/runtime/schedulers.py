"""diffusers schedulers configured as Stable Diffusion was trained, for any preset.

Only the configuration lives here; the update math is diffusers' own. The defaults are SD's
(scaled-linear betas 0.00085..0.012 over 1000 steps, "leading" spacing with offset 1, no clipping of
the predicted x0), so DDIM sampling ends at, and DDIM inversion starts from, alphas_cumprod[0]
(set_alpha_to_one=False): inversion followed by sampling returns to the same noise level, as in the
MasaCtrl / MCA-Ctrl inversion code.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

from vgrt.errors import InvalidInputError
from vgrt.library_noise import warnings_silenced
from vgrt.models.presets import Preset, get_preset

SCHEDULERS = ("ddim", "ddim_inverse", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
# DPM-Solver's set_timesteps passes a torch tensor to np.array; numpy 2 warns about torch's __array__.
_NUMPY_COPY_DEPRECATION = (DeprecationWarning, "__array__ implementation doesn't accept a copy keyword")


@dataclass(frozen=True)
class SchedulerSettings:
    """The noise schedule a model was trained with, and how inference steps are spaced.

    Args:
        prediction_type: what the UNet predicts: 'epsilon' (SD 1.x, SDXL) or 'v_prediction' (SD 2.1).
        timestep_spacing: 'leading' (SD's own configs), 'trailing' or 'linspace' (DPM-Solver and DDIM
            only; DDIM inversion has no 'linspace').
        solver_order: DPM-Solver++ multistep order (2 is what SD pipelines use).
    """

    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    solver_order: int = 2

    @classmethod
    def for_preset(cls, preset: str | Preset, **overrides: Any) -> "SchedulerSettings":
        """The schedule of `preset`: a weights folder's scheduler config (the Preset of a folder carries it in
        `extra["scheduler"]`), else SD's, with the preset's prediction type; keyword overrides win."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        return replace(cls(prediction_type=preset.prediction_type, **preset.extra.get("scheduler", {})), **overrides)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise InvalidInputError(
                f"unknown prediction_type {self.prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in SPACINGS:
            raise InvalidInputError(
                f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of: {', '.join(SPACINGS)}"
            )


def build_scheduler(kind: str, settings: SchedulerSettings = SchedulerSettings()):
    """A fresh diffusers scheduler: 'ddim', 'ddim_inverse' or 'dpmsolver++' (DPMSolverMultistepScheduler).

    Schedulers keep per-run state (DPM-Solver's past outputs): give each concurrent loop its own.
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler

    common = {k: v for k, v in asdict(settings).items() if k not in ("set_alpha_to_one", "solver_order")}
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=settings.set_alpha_to_one)
    if kind == "ddim_inverse":
        if settings.timestep_spacing == "linspace":
            raise InvalidInputError("DDIM inversion has no 'linspace' timestep spacing; use 'leading' or 'trailing'")
        return DDIMInverseScheduler(**common, clip_sample=False, set_alpha_to_one=settings.set_alpha_to_one)
    if kind == "dpmsolver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=settings.solver_order)
    raise InvalidInputError(f"unknown scheduler {kind!r}; choose one of: {', '.join(SCHEDULERS)}")


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")


def set_timesteps(scheduler, steps: int) -> None:
    """Start a run of `steps` inference steps (this also resets multistep state)."""
    check_steps(steps)
    if steps > scheduler.config.num_train_timesteps:
        raise InvalidInputError(
            f"steps={steps} exceeds the scheduler's {scheduler.config.num_train_timesteps} training timesteps"
        )
    with warnings_silenced(_NUMPY_COPY_DEPRECATION):
        scheduler.set_timesteps(steps)
