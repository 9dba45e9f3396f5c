"""Adapters that plug ckptstore into training frameworks; each module imports its framework, this package does not.

- :mod:`ckptstore.integrations.lightning`: ``CkptstoreCheckpointIO``, a Lightning ``CheckpointIO`` (save, load,
  remove, async) and ``load_from_checkpoint`` for ``LightningModule`` classes.
- :mod:`ckptstore.integrations.accelerate`: ``save_state`` / ``load_state`` for an ``accelerate.Accelerator``.
- :mod:`ckptstore.integrations.transformers`: ``CkptstoreTrainer`` (and its mixin) so that a transformers
  ``Trainer`` saves its checkpoints through a ``CheckpointManager`` and ``train(resume_from_checkpoint=...)``
  resumes from them.

Install the frameworks with ``pip install 'ckptstore[integrations]'``. ``import ckptstore`` never imports any of
them.

Example::

    from ckptstore.integrations.lightning import CkptstoreCheckpointIO
    trainer = lightning.pytorch.Trainer(plugins=[CkptstoreCheckpointIO()], callbacks=[ModelCheckpoint(...)])
"""
