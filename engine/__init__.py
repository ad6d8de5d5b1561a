"""The run engine, which knows no phase of the method.

* ``options``: the command-line flags of every script;
* ``common``: the logger, error types, progress bars, batch split;
* ``launch``: one-line user errors, ``main_entry``, the workers, start-up checks, seeding;
* ``provenance``: ``<stage>_env.json`` (code, versions, GPUs, nodes, determinism, data fingerprints);
* ``backends``: the process-wide torch switches (``--cudnn_benchmark``, ``--tf32``, ``--deterministic``);
* ``state``: the training state ``latest.pth`` and resuming;
* ``optim``: SGD, the poly lr schedule, precisions;
* ``network``: building the network for a run (weights, device, DDP);
* ``validation``: mIoU over the target val set;
* ``trainer``: the ``Stage`` protocol and the ``Trainer`` loop.
"""
