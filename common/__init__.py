"""What every floor shares (simulator `envs`, model `policy`, robot-side `rollouts`): the user's
mistakes as exceptions (`common.errors`), the command harness (`common.cli`), the lock on an
output folder (`common.lock`) and writes a reader never sees half done (`common.files`).

Nothing here imports the other packages: each of them may import this one.
"""
