"""ALBERT pretraining (MLM + sentence-order prediction) on albert_kernels: the bundled corpus and
its tokenizer (data.py), the LAMB optimizer (optim.py) and the training loop behind
``albert-kernels pretrain`` (pretrain.py)."""
