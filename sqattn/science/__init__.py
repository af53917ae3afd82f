"""Scientific applications built on sqattn: each subpackage brings its own data, models and tasks, trained by
the one trainer (``sqattn.train.train_and_evaluate``) through tasks registered in ``sqattn.train.tasks.TASKS``."""
