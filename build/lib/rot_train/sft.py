"""SFT baselines with the Stage II trainer and configs: ``deepspeed rot_train/sft.py --mode sft-cot|sft-nocot --shards S --backbone B --out runs/sft-cot``."""

from rot_train.launch import app_for

if __name__ == "__main__":
    app_for(stage=2, mode="sft-cot")()
