"""A bounded pool of synthetic images (normalised, in float16) with the teacher's logits for them.

Images are made once and reused for many student steps; since the teacher is frozen, its logits are stored beside each
image and a student step on a stored image costs only the student. When the pool is full the oldest images are
replaced. The pool is saved incrementally in shards under the run folder, so a checkpoint rewrites only what changed
since the last one, never the whole pool. A shard is never overwritten: each save writes new files (named by the save's
number) and last.pt names the files of its own save, so a run killed between the shards and last.pt resumes from the
pool last.pt describes. Files are deleted once no checkpoint on disk can name them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import safe_torch_load
from ..io import atomic_torch_save

SHARD_IMAGES = 4096
POOL_FORMAT = "dfad-edge-pool-shard/2"


class SyntheticPool:
    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int, device: torch.device):
        self.capacity, self.count = capacity, 0
        self.stored = torch.empty((capacity, *image_shape), dtype=torch.float16, device=device)
        self.teacher_logits = torch.empty((capacity, num_classes), dtype=torch.float16, device=device)
        self._dirty_shards: set[int] = set()
        self.files: dict[int, str] = {}  # shard -> the file holding it as of the last save (recorded in last.pt)
        self.saves = 0

    @property
    def filled(self) -> int:
        return min(self.count, self.capacity)

    def add(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Normalised images (the models' input space) and the teacher's logits for them."""
        positions = (torch.arange(len(images), device=self.stored.device) + self.count) % self.capacity
        self.stored[positions] = images.detach().to(torch.float16)
        self.teacher_logits[positions] = teacher_logits.detach().to(torch.float16)
        # Which shards changed, worked out on the host (reading positions back would stall a CUDA stream).
        first, end = self.count % self.capacity, self.count % self.capacity + len(images)
        for start, stop in ((first, min(end, self.capacity)), (0, end - self.capacity)):  # the part after a wrap
            if stop > start:
                self._dirty_shards.update(range(start // SHARD_IMAGES, (stop - 1) // SHARD_IMAGES + 1))
        self.count += len(images)

    def sample_indices(self, size: int, recent: int = 0, recent_fraction: float = 0.0) -> torch.Tensor:
        """Random pool indices; ``recent_fraction`` of them from the ``recent`` newest images (what the generator makes
        now, aimed at the student's current weaknesses), the rest from the whole pool."""
        device = self.stored.device  # drawn where the pool is: a host-to-device copy would stall a CUDA stream
        from_recent = int(size * recent_fraction) if recent else 0
        anywhere = torch.randint(0, self.filled, (size - from_recent,), device=device)
        if not from_recent:
            return anywhere
        newest = self.newest(recent)
        return torch.cat([anywhere, newest[torch.randint(0, len(newest), (from_recent,), device=device)]])

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.stored[indices].float()

    def newest(self, count: int) -> torch.Tensor:
        """Indices of the most recently added images (what the generator makes now)."""
        count = min(count, self.filled)
        return (torch.arange(self.count - count, self.count, device=self.stored.device) % self.capacity)

    def class_histogram(self) -> torch.Tensor:
        predicted = self.teacher_logits[:self.filled].float().argmax(1).cpu()
        return torch.bincount(predicted, minlength=self.teacher_logits.shape[1]).float()

    # --- persistence ---------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write the shards changed since the last save into new files, then delete the files neither this save nor
        the previous one names (the previous last.pt may still be the one on disk until this save's is written)."""
        self.saves += 1
        files = dict(self.files)
        for shard in sorted(self._dirty_shards):
            start, end = shard * SHARD_IMAGES, min((shard + 1) * SHARD_IMAGES, self.capacity)
            files[shard] = f"shard_{shard:05d}.{self.saves:06d}.pt"
            atomic_torch_save({"format": POOL_FORMAT, "start": start, "images": self.stored[start:end].cpu().clone(),
                               "teacher_logits": self.teacher_logits[start:end].cpu().clone()}, folder / files[shard])
        self._delete_files_except(folder, {*self.files.values(), *files.values()})
        self.files = files
        self._dirty_shards.clear()

    @staticmethod
    def _delete_files_except(folder: Path, kept: set[str]) -> None:
        for path in folder.glob("shard_*.pt"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def state(self) -> dict:
        """What last.pt records of the pool: how many images were added, and which file holds each shard."""
        return {"count": self.count, "files": dict(self.files), "saves": self.saves}

    def load(self, folder: Path, state: dict) -> None:
        """The pool as ``state`` (from last.pt) describes it; shard files a later, unfinished save wrote are deleted."""
        self.count, self.files, self.saves = state["count"], dict(state["files"]), state["saves"]
        for name in self.files.values():
            shard = safe_torch_load(folder / name)
            start = shard["start"]
            self.stored[start:start + len(shard["images"])] = shard["images"].to(self.stored.device)
            self.teacher_logits[start:start + len(shard["images"])] = shard["teacher_logits"].to(self.stored.device)
        self._delete_files_except(folder, set(self.files.values()))
