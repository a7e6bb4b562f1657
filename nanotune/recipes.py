"""The chapters' settings in one table: each recipe's numbers, and the chapter each comes from.

The scripts in chapters/ read their numbers here, `train.py --recipe NAME` fills in the train.py
flags a recipe names (where the command line does not set them), and tests/test_chapters.py checks
that each script runs with its chapter's numbers. The keys are train.py's flag names (`lr` is
--lr, `warmup_steps` is --warmup-steps); `eval_batch_size`, `max_total_length` and `temperature`
have no train.py flag and are the scripts' own. A comment says where a number is not the chapter's.
"""

RECIPES = {
    "ch1": {
        "chapter": "1, Introduction: GPT-2 on anecdotes and jokes",
        "lr": 5e-5,                    # torch.optim.Adam(model.parameters(), lr=5e-5)
        "epochs": 3,                   # for epoch in range(3)
        "max_length": 512,             # batch_encode_plus(data, max_length=512, ...)
        "weight_decay": 0.0,           # Adam: no weight decay (AdamW with none is Adam)
        "lr_schedule": "constant",     # no scheduler
        "warmup_steps": 0,
        "max_grad_norm": 0.0,          # no clipping
        "batch_size": 8,               # nanotune's: the chapter feeds the whole file as one batch
    },
    "ch2": {
        "chapter": "2, Overview: GPT-2 with Trainer, then generate",
        "lr": 5e-5,                    # Trainer's default learning_rate
        "epochs": 1,                   # num_train_epochs=1
        "batch_size": 1,               # per_device_train_batch_size=1
        "warmup_steps": 100,           # warmup_steps=100
        "weight_decay": 0.01,          # weight_decay=0.01
        "lr_schedule": "linear",       # Trainer's default lr_scheduler_type
        "max_grad_norm": 1.0,          # Trainer's default max_grad_norm
        "max_total_length": 100,       # generate(max_length=100): the prompt's tokens included
        "temperature": 0.7,            # generate(temperature=0.7, do_sample=True)
    },
    "ch4": {
        "chapter": "4, What is fine-tuning: BERT sentiment classification",
        "lr": 5e-5,                    # Trainer's default learning_rate
        "epochs": 3,                   # num_train_epochs=3
        "batch_size": 32,              # per_device_train_batch_size=32
        "eval_batch_size": 64,         # per_device_eval_batch_size=64 (train.py evaluates in --batch-size)
        # warmup_steps=500: two thirds of an IMDB epoch (25,000 reviews / 32 = 782 steps). On a small
        # set it is longer than the whole run, and the rate never rises: the scripts warm up over
        # min(500, a tenth of the run) instead (chapters/ch4_bert_classification.py).
        "warmup_steps": 500,
        "weight_decay": 0.01,          # weight_decay=0.01
        "lr_schedule": "linear",       # Trainer's default lr_scheduler_type
        "max_grad_norm": 1.0,          # Trainer's default max_grad_norm
        # truncation=True: at the model's own limit (512 for BERT), train.py's default --max-length
    },
    "ch5": {
        "chapter": "5, Steps: general and target-domain data mixed (the chapter gives no numbers)",
        "lr": 5e-5,                    # chapter 1's rate
        "epochs": 3,                   # chapter 1's epochs
        "batch_size": 8,               # as ch1
        "weight_decay": 0.01,          # chapter 2's AdamW decay, on the matrices only
        "lr_schedule": "constant",     # chapter 1's: no scheduler
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "max_length": 512,             # chapter 1's
    },
    "ch17": {
        "chapter": "17, Conclusion: transfer learning (a new head, freezing, new tokens)",
        "lr": 5e-5,                    # chapter 4's rate
        "epochs": 3,                   # chapter 4's epochs: the head alone, then one more block each epoch
        "batch_size": 32,              # chapter 4's
        "weight_decay": 0.01,          # chapter 4's
        "lr_schedule": "linear",
        "warmup_steps": 0,             # gradual unfreezing already starts gently: the head alone first
        "max_grad_norm": 1.0,
        "unfreeze": "gradual",         # ULMFiT (Howard and Ruder, 2018), one of chapter 17's strategies
        "new_head": True,              # "replace the last layer"
    },
    "qlora": {
        "chapter": "2's quantization with chapter 1's loop (QLoRA: Dettmers et al., 2023)",
        "quantize": "4bit",
        "quant_type": "nf4",           # QLoRA's 4-bit NormalFloat
        "lora_r": 8,                   # nanotune's default rank; QLoRA used 64 on far larger models
        "lora_alpha": 16,
        "lr": 2e-4,                    # QLoRA's rate for models up to 13B parameters
        "epochs": 3,                   # chapter 1's
        "batch_size": 8,               # as ch1
        "weight_decay": 0.0,           # chapter 1's Adam
        "lr_schedule": "constant",     # chapter 1's
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "max_length": 512,             # chapter 1's
    },
}
