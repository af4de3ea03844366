"""The SFT baselines (--mode sft-cot|sft-nocot): ``deepspeed rot_train/sft.py ...`` from packages/, the same as ``deepspeed --module rot_train sft ...``."""

from rot_train.launch import run_script

if __name__ == "__main__":
    run_script("sft")
