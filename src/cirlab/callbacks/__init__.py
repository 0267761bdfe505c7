"""Lightning callbacks: ``last_checkpoint`` (resumable state), ``pictures`` and
``hyperres_pictures`` (figures of outputs during training)."""
