"""Stage I (visual alignment): ``deepspeed rot_train/stage1.py --shards S --backbone B --out runs/stage1``."""

from rot_train.launch import app_for

if __name__ == "__main__":
    app_for(stage=1)()
