"""Stage II (latent SFT): ``deepspeed rot_train/stage2.py --shards S --backbone B --init runs/stage1/export --out runs/stage2``."""

from rot_train.launch import app_for

if __name__ == "__main__":
    app_for(stage=2)()
