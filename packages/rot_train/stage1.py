"""Stage I (visual alignment): ``deepspeed rot_train/stage1.py ...`` from packages/, the same as ``deepspeed --module rot_train stage1 ...``."""

from rot_train.launch import run_script

if __name__ == "__main__":
    run_script("stage1")
