"""Datasets and loaders from command-line options (shared by every script)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Protocol

from datasets.cityscapes import CityscapesDataset
from datasets.class_balance import class_balanced_list
from datasets.errors import DatasetError
from datasets.gta5 import GTA5Dataset
from datasets.label_info import load_label_info
from datasets.loader import make_loader
from datasets.sampler import ShardSampler, StreamSampler
from datasets.synthia import SynthiaDataset
from datasets.transforms import JointAugment
from utils import distributed as du
from utils.files import atomic_write


def require_root(path: str, flag: str) -> str:
    """A dataset root given on the command line must be a folder (the error names the flag)."""
    if not os.path.isdir(path):
        raise DatasetError(f"{flag} {path}: folder not found")
    return path


class ClassBalanceOptions(Protocol):
    """The options the class-balanced list is drawn from (the parsed namespace has them)."""

    num_steps: int
    batch_size: int
    random_seed: int
    num_classes: int


def make_augment(args: argparse.Namespace, colour: bool = True) -> JointAugment:
    """The joint augmentation of docs/METHOD.md section 1 from ``--resize --rcrop --hflip --clrjit_params --noaug``."""
    return JointAugment(
        resize=args.resize,
        crop_wh=tuple(args.rcrop),
        hflip=args.hflip,
        clrjit=tuple(args.clrjit_params) if colour else (0.0, 0.0, 0.0, 0.0),
        enabled=not args.noaug,
    )


def class_balance_draws(num_steps: int, batch_size: int) -> int:
    """``max_iters`` of the class-balanced list: ``--num-steps`` times the total ``--batch-size``.

    The original divides ``--batch-size`` by the world size before it builds the dataset and
    then multiplies the per-rank batch by the world size again: ``num_steps * (batch_size //
    world_size) * world_size`` (93,750 x 8 = 750,000 for phase 1 on 4 GPUs). That is
    ``num_steps * batch_size``, since a run's batch must divide over its ranks
    (``engine.common.per_rank`` stops a run otherwise before any dataset is built).
    """
    return num_steps * batch_size


def balanced_file_list(args: ClassBalanceOptions, root: str, cache_dir: str | None) -> list[str]:
    """The class-balanced GTA5 order (docs/METHOD.md section 1), cached under ``cache_dir``.

    Drawn from NumPy's generator seeded with ``--random-seed`` (as the original's
    ``np.random.seed(args.random_seed)``), :func:`class_balance_draws` draws. The cache key
    covers everything that changes the list: the label-info file's bytes, the number of draws,
    the seed and the class count.
    """
    info_path = os.path.join(root, "gtav_label_info.p")
    label_to_file, file_to_label = load_label_info(info_path)
    max_iters = class_balance_draws(args.num_steps, args.batch_size)
    seed = int(args.random_seed)
    with open(info_path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    key = f"class_balance_{digest}_{max_iters}_{seed}_{args.num_classes}.json"
    cache = os.path.join(cache_dir, key) if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                names = json.load(f)
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return names
        except (OSError, ValueError):
            pass
    names = class_balanced_list(label_to_file, file_to_label, max_iters, seed=seed, num_classes=args.num_classes)
    if cache:
        atomic_write(cache, lambda f: f.write(json.dumps(names)), mode="w")
    return names


def source_train_dataset(args: argparse.Namespace, cache_dir: str | None = None):
    """GTA5 (class-balanced order) or SYNTHIA training set."""
    require_root(args.src_rootpath, "--src_rootpath")
    if args.src_dataset == "synthia":
        return SynthiaDataset(args.src_rootpath, img_size=args.src_img_size, augment=make_augment(args),
                              seed=args.random_seed, num_classes=args.num_classes)
    names = balanced_file_list(args, args.src_rootpath, cache_dir)
    return GTA5Dataset(args.src_rootpath, img_size=args.src_img_size, augment=make_augment(args),
                       seed=args.random_seed, file_list=names, skip_bad_images=args.skip_bad_images,
                       num_classes=args.num_classes)


def target_train_dataset(args: argparse.Namespace, soft_labels: bool = False, augment: bool = True,
                         ground_truth: bool | None = None) -> CityscapesDataset:
    """Cityscapes train; ``ground_truth`` (default: unless ``--no_pseudo_eval``) reads the
    ``gtFine/train`` labels when all exist, for pseudo-label accuracy only."""
    require_root(args.tgt_rootpath, "--tgt_rootpath")
    if ground_truth is None:
        ground_truth = not args.no_pseudo_eval
    return CityscapesDataset(
        args.tgt_rootpath, split="train", img_size=args.tgt_img_size,
        augment=make_augment(args) if augment else None, seed=args.random_seed,
        soft_labels_folder=args.soft_labels_folder if soft_labels else None,
        num_classes=args.num_classes, train_labels=ground_truth,
    )


def target_val_dataset(args: argparse.Namespace) -> CityscapesDataset:
    require_root(args.tgt_rootpath, "--tgt_rootpath")
    return CityscapesDataset(args.tgt_rootpath, split="val", img_size=args.tgt_img_size, augment=None,
                             seed=args.random_seed, num_classes=args.num_classes)


def stream(dataset, batch_per_rank: int, env: du.DistEnv, seed: int, shuffle: bool, start_batch: int,
           num_workers: int) -> Iterator[dict]:
    """Endless batches of ``dataset`` for this rank, starting at batch ``start_batch``; the order
    from ``--random-seed`` (``seed``), shuffled unless ``--noshuffle``."""

    if len(dataset) == 0:
        raise DatasetError(f"{getattr(dataset, 'root', 'dataset')}: no training images")
    sampler = StreamSampler(len(dataset), batch_per_rank, env.world_size, env.rank, seed=seed, shuffle=shuffle,
                            start_iter=start_batch)
    return iter(make_loader(dataset, sampler, batch_per_rank, num_workers, env))


def shard_loader(dataset, batch_per_rank: int, env: du.DistEnv, num_workers: int):
    """Every sample exactly once over all ranks, no padding (validation, soft labels)."""

    sampler = ShardSampler(len(dataset), env.world_size, env.rank)
    return make_loader(dataset, sampler, batch_per_rank, num_workers, env)
