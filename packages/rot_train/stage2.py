"""Stage II (latent SFT): ``deepspeed rot_train/stage2.py ...`` from packages/, the same as ``deepspeed --module rot_train stage2 ...``."""

from rot_train.launch import run_script

if __name__ == "__main__":
    run_script("stage2")
