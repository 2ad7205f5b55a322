"""Fine-tuning: LoRA (experts too), supervised fine-tuning, expert-specialised tuning, upcycling."""
