"""One learner per strategy family: head (cached features), peft (lora / ia3), finetune (partial / full)."""
