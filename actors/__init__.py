"""Ray actors of a run: scheduler, data packer, trainer group, evaluator, registrar, and their messages."""
