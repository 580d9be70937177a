"""Progress bars that render in the terminal of the driver, also from inside Ray workers."""

from __future__ import annotations

from tqdm import tqdm

from rayforge.ray_utils import in_ray_worker


def progress_bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False):
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(iterable, desc=desc, total=total)
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)


def close_bars() -> None:
    """Close every bar still open (an error or Ctrl-C can leave one): it is drawn one last time now, before the
    error line, instead of at interpreter exit, after it."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
