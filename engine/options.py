"""Command-line options shared by every script (docs/METHOD.md section 7): run, data, model,
optimisation, the trainer's flags and the original's ignored ones. The flags of one phase live
beside its stage (``add_arguments`` in ``stages/phase1.py``, ...); ``stages/options.py`` builds
each script's parser from both.

Every flag of the original keeps its name, default and meaning, except ``--thresholds_path``
of phase 2, which has no default (the original's ``avg`` names no file). Flags the original has
but never reads are accepted and ignored (listed under "ignored" in ``--help``).

No torch import at the top: ``predict.py --onnx`` builds its parser from this module without
loading torch (docs/INFERENCE.md).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

# What add_argument_group returns; each stage adds its flags to one (argparse names the class privately).
ArgumentGroup = argparse._ArgumentGroup

TRAINING_STAGES = ("phase1", "phase2", "source_only")  # the scripts that run engine.trainer

IGNORED = [
    ("--model", str, "DeepLab"), ("--lambda-seg", float, 0.1), ("--lambda-adv-target1", float, 0.0002),
    ("--lambda-adv-target2", float, 0.001), ("--set", str, "train"), ("--save-num-images", int, 2),
    ("--log-dir", str, "./log"), ("--ngpus_per_node", int, 1), ("--pseudo_labels_folder", str, ""),
]
IGNORED_FLAGS = ["--random-mirror", "--random-scale", "--is-training", "--not-restore-last",
                 "--used_save_pseudo"]


# --tgt_img_size's default: the size Cityscapes images are validated and evaluated at (predict.py's
# --size default too).
TGT_IMG_SIZE = "2048,1024"


class OptionError(ValueError):
    """A command-line value is wrong; the message names the flag."""


def major_minor(version: str) -> tuple[int, int]:
    """``(2, 14)`` for ``"2.14.1+cu130"``; ``(0, 0)`` when unreadable."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """``"W,H"`` as two positive integers; :class:`OptionError` naming ``flag`` otherwise."""
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{flag}: expected W,H (two integers), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise OptionError(f"{flag}: sizes must be positive, got {text!r}")
    return w, h


def parse_scales(text: str, flag: str = "--scales") -> tuple[float, ...]:
    """Comma-separated positive test scales (``"0.75,1.0,1.25"``); :class:`OptionError` naming ``flag``."""
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not scales or min(scales) <= 0:
        raise OptionError(f"{flag}: scales must be positive, got {scales}")
    return scales


def new_parser(description: str) -> argparse.ArgumentParser:
    """An empty parser whose ``--help`` shows every default."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_shared_arguments(p: argparse.ArgumentParser, d: Mapping[str, object], training: bool) -> None:
    """The flags every script shares (groups run, data, model, optimisation).

    ``d``: the script's own defaults of ``--learning-rate``, ``--num-steps``,
    ``--num-steps-stop``, ``--clrjit_params`` and ``--resume`` (each stage module's
    ``FLAG_DEFAULTS``). ``training``: also the trainer's flags (``--activation_checkpointing``,
    ``--fused_optimizers``, ``--max_skipped_steps``), which only the training scripts have.
    """
    g = p.add_argument_group("run")
    g.add_argument("--snapshot-dir", dest="snapshot_dir", default="./snapshots/",
                   help="folder for logs, checkpoints, tensorboard")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                   help="total batch over all ranks")
    g.add_argument("--batch_size_val", type=int, default=4, help="total validation batch over all ranks")
    g.add_argument("--iter-size", dest="iter_size", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--num-workers", dest="num_workers", type=int, default=16,
                   help="data workers in total (divided by the number of ranks, as the original)")
    g.add_argument("--gpus", default="0,1", help="GPU ids; with --dist one process per id")
    g.add_argument("--dist", action="store_true", help="spawn one process per GPU of --gpus (DDP)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU (gloo under --dist)")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others in one collective before the job fails")
    g.add_argument("--tensorboard", action="store_true", help="write tensorboardX scalars")
    g.add_argument("--random-seed", dest="random_seed", type=int, default=1234)
    g.add_argument("--print-every", dest="print_every", type=int, default=20)
    g.add_argument("--quiet", action="store_true", help="no progress bars (for log files)")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    g.add_argument("--amp", choices=["fp16", "bf16", "off"], default=None,
                   help="mixed precision of the training steps only; default fp16 on CUDA (the original), "
                        "off on the CPU. Validation, soft labels and evaluate.py ignore it (see --inference_amp)")
    g.add_argument("--inference_amp", choices=["off", "fp16", "bf16"], default="off",
                   help="half-precision autocast for validation, generate_soft_label.py and evaluate.py. "
                        "off = float32, as the original. fp16/bf16 are faster but change the logits, "
                        "hence the soft labels, the thresholds made from them, the validation mIoU and "
                        "which checkpoint is kept as the best")
    g.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format of the network and its input images on CUDA "
                        "(training and inference)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the stems, body and head (in place; checkpoints unchanged), for "
                        "training and for evaluate.py / generate_soft_label.py; the first batches include "
                        "the compilation")
    g.add_argument("--cudnn_benchmark", action="store_true",
                   help="CUDA: cuDNN autotuning (torch.backends.cudnn.benchmark): time the convolution "
                        "algorithms for each new input shape and keep the fastest. Off = cuDNN's default "
                        "choice, as the original (its line is commented out). Often faster for the fixed "
                        "training crop; the chosen algorithms may change the last bits of the results")
    g.add_argument("--deterministic", action="store_true",
                   help="reproducible kernels where PyTorch has them: cuDNN deterministic without autotuning, "
                        "torch.use_deterministic_algorithms (warn only: on CUDA the bilinear upsampling's "
                        "backward and the 2-D cross entropy have no deterministic kernel and warn once), "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 for every rank. Slower on CUDA; on the CPU runs are "
                        "deterministic without it. Recorded in <stage>_env.json")
    g.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="CUDA, Ampere and newer: TensorFloat-32 for float32 convolutions and matmuls. "
                        "default = PyTorch's settings untouched (convolutions in TF32, matmuls in full "
                        "float32: what the original gets); on = both in TF32; off = both in full float32 "
                        "(slower). Acts on float32 work only: --amp off, --inference_amp off, and the "
                        "float32 parts of autocast")
    if training:
        g.add_argument("--activation_checkpointing", action="store_true",
                       help="recompute the activations of layer2..layer4 in the backward instead of keeping "
                            "them: much less GPU memory for about one more forward of the body; same updates")
        g.add_argument("--fused_optimizers", choices=["auto", "on", "off"], default="auto",
                       help="fused optimizer kernels (SGD, Adam): auto = on CUDA only, where they spare the fp16 "
                            "grad scaler one host sync per optimizer and iteration; off = PyTorch's default "
                            "kernels; on = also on the CPU (torch >= 2.4)")
        g.add_argument("--max_skipped_steps", type=int, default=100,
                       help="--amp fp16: stop after this many consecutive iterations whose optimizer steps the "
                            "grad scaler skipped (non-finite gradients; it halves the loss scale at each); "
                            "0 never stops")
    g = p.add_argument_group("data")
    g.add_argument("--src_dataset", default="gta5", choices=["gta5", "synthia"])
    g.add_argument("--tgt_dataset", default="cityscapes_train", choices=["cityscapes_train"],
                   help="the target training set; Cityscapes train is the only one, as in the original "
                        "(the flag is kept so that the original's commands run unchanged)")
    g.add_argument("--tgt_val_dataset", default="cityscapes_val", choices=["cityscapes_val"],
                   help="the target validation set; Cityscapes val is the only one, as in the original")
    g.add_argument("--src_rootpath", default="datasets/gta5")
    g.add_argument("--tgt_rootpath", default="datasets/cityscapes")
    g.add_argument("--src_img_size", default=None,
                   help="W,H source images are resized to (default 1914,1052 GTA5, 1280,760 SYNTHIA)")
    g.add_argument("--tgt_img_size", default=TGT_IMG_SIZE, help="W,H Cityscapes images are resized to")
    g.add_argument("--resize", type=int, default=2200, help="random-resize base width")
    g.add_argument("--rcrop", default="896,512", help="random crop W,H")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--clrjit_params", default=d["clrjit_params"], help="brightness,contrast,saturation,hue")
    g.add_argument("--noaug", action="store_true", help="no resize/crop/flip: the whole image is the sample")
    g.add_argument("--noshuffle", action="store_true")
    g.add_argument("--no_droplast", action="store_true", help="accepted; our sample stream never drops")
    g.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images with a warning")
    g.add_argument("--no_pseudo_eval", action="store_true",
                   help="do not read the Cityscapes train ground truth (gtFine/train). When every train image "
                        "has one, the target ground truth is read only to measure pseudo-label accuracy "
                        "(pseudo_acc in metrics.jsonl, phases 1 and 2) and the soft labels' mIoU; it never "
                        "reaches a loss")
    g = p.add_argument_group("model")
    g.add_argument("--num-classes", dest="num_classes", type=int, default=19)
    g.add_argument("--ignore-label", dest="ignore_label", type=int, default=250)
    g.add_argument("--layer", type=int, default=1, choices=[0, 1, 2], help="stem ends after this layer")
    g.add_argument("--hidden_dim", type=int, default=128)
    g.add_argument("--freeze_bn", action="store_true")
    g.add_argument("--resume", default=d["resume"],
                   help="official-format weights to start from; a missing file is an error. Training "
                        "with --resume '' starts from the ImageNet file (--imagenet) with a freshly "
                        "initialised ASPP head and classifiers, as the original without --resume")
    g.add_argument("--imagenet", default=os.path.join("pretrained", "resnet101-5d3b4d8f.pth"),
                   help="torchvision ResNet-101 file, used only when --resume is empty")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", dest="learning_rate", type=float, default=d["learning_rate"])
    g.add_argument("--learning-rate-D", dest="learning_rate_D", type=float, default=1e-4)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=5e-4)
    g.add_argument("--power", type=float, default=0.9)
    g.add_argument("--num-steps", dest="num_steps", type=int, default=d["num_steps"])
    g.add_argument("--num-steps-stop", dest="num_steps_stop", type=int, default=d["num_steps_stop"])
    g.add_argument("--save-pred-every", dest="save_pred_every", type=int, default=1000)
    g.add_argument("--save_latest_every", type=int, default=None,
                   help="iterations between full training states latest.pth (default --save-pred-every)")
    g.add_argument("--resume_from", default="", help="continue a run: PATH of latest.pth or 'auto'")


def add_ignored_arguments(p: argparse.ArgumentParser) -> None:
    """The original's flags that it never reads: accepted and ignored (hidden from ``--help``
    but for the group's one line naming them)."""
    g = p.add_argument_group("ignored", "flags of the original that it never reads; accepted, ignored")
    for flag, typ, default in IGNORED:
        g.add_argument(flag, type=typ, default=default, help=argparse.SUPPRESS)
    for flag in IGNORED_FLAGS:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.description = "ignored flags of the original: " + " ".join(f for f, _, _ in IGNORED) + " " + " ".join(IGNORED_FLAGS)


def finalize_shared(args: argparse.Namespace, training: bool) -> argparse.Namespace:
    """Parse the shared flags' compound values and check them (``training``: also the trainer's
    flags); raises :class:`OptionError` naming the flag. Each stage checks its own flags after."""
    try:
        args.gpus = [int(v) for v in str(args.gpus).split(",") if v.strip() != ""]
    except ValueError:
        raise OptionError(f"--gpus: expected comma-separated integers, got {args.gpus!r}") from None
    if not args.gpus:
        args.gpus = [0]
    args.rcrop = parse_size(args.rcrop, "--rcrop") if isinstance(args.rcrop, str) else tuple(args.rcrop)
    if args.src_img_size is None:
        args.src_img_size = "1280,760" if args.src_dataset == "synthia" else "1914,1052"
    if isinstance(args.src_img_size, str):
        args.src_img_size = parse_size(args.src_img_size, "--src_img_size")
    if isinstance(args.tgt_img_size, str):
        args.tgt_img_size = parse_size(args.tgt_img_size, "--tgt_img_size")
    if isinstance(args.clrjit_params, str):
        try:
            vals = tuple(float(v) for v in args.clrjit_params.split(","))
        except ValueError:
            vals = ()
        if len(vals) != 4 or min(vals) < 0:
            raise OptionError(f"--clrjit_params: expected four non-negative numbers b,c,s,h, got {args.clrjit_params!r}")
        args.clrjit_params = vals
    for flag, value in (("--batch-size", args.batch_size), ("--batch_size_val", args.batch_size_val),
                        ("--iter-size", args.iter_size), ("--num-steps", args.num_steps),
                        ("--num-steps-stop", args.num_steps_stop), ("--save-pred-every", args.save_pred_every),
                        ("--print-every", args.print_every)):
        if value <= 0:
            raise OptionError(f"{flag}: must be a positive integer, got {value}")
    if args.dist_timeout <= 0:
        raise OptionError(f"--dist_timeout: must be positive, got {args.dist_timeout}")
    if args.num_workers < 0:
        raise OptionError(f"--num-workers: must be >= 0, got {args.num_workers}")
    # --num-steps-stop > --num-steps is accepted, as the original: training then ends with the
    # schedule (engine.trainer.stop_iteration) and a WARNING line says so.
    if args.save_latest_every is None:
        args.save_latest_every = args.save_pred_every
    if args.save_latest_every <= 0:
        raise OptionError(f"--save_latest_every: must be positive, got {args.save_latest_every}")
    if training:
        _check_training_arguments(args)
    if args.num_classes not in (19, 16, 13):
        raise OptionError(f"--num-classes: must be 19, 16 or 13, got {args.num_classes}")
    if args.deterministic and args.cudnn_benchmark:
        raise OptionError("--deterministic: cannot be combined with --cudnn_benchmark (autotuning picks the "
                          "convolution algorithms by timing, so two runs may use different ones); use one of them")
    if training and args.activation_checkpointing and args.compile:
        raise OptionError("--activation_checkpointing: cannot be combined with --compile; use one of them")
    if args.amp is None:
        args.amp = "fp16" if cuda_usable() and not args.cpu else "off"
    if args.amp != "off" and (args.cpu or not cuda_usable()) and args.amp == "fp16":
        raise OptionError("--amp fp16: needs CUDA; use --amp bf16 or off on the CPU")
    if args.inference_amp == "fp16" and (args.cpu or not cuda_usable()):
        raise OptionError("--inference_amp fp16: needs CUDA; use --inference_amp bf16 or off on the CPU")
    return args


def cuda_usable() -> bool:
    """:func:`utils.distributed.cuda_usable`, imported here, not at the top: light tools
    (``predict.py --onnx``) read this module without torch."""
    from utils.distributed import cuda_usable as usable  # torch only when options are checked

    return usable()


def _check_training_arguments(args: argparse.Namespace) -> None:
    import torch  # see cuda_usable

    if args.max_skipped_steps < 0:
        raise OptionError(f"--max_skipped_steps: must be >= 0 (0: never stop), got {args.max_skipped_steps}")
    if args.fused_optimizers == "on" and (args.cpu or not cuda_usable()) \
            and major_minor(torch.__version__) < (2, 4):
        raise OptionError(f"--fused_optimizers on: the CPU's fused kernels need torch >= 2.4, this is "
                          f"{torch.__version__}; use auto or off")
