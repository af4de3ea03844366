"""``python -m rot_train stage2 ...`` and ``deepspeed --module rot_train stage2 ...``: the rot-train command."""

from rot_train.launch import app

if __name__ == "__main__":
    app(prog_name="rot_train")
