"""Knowledge distillation from the original model into the compressed one (the `distill` stage's engine).

    targets = teacher_targets(teacher, windows)        teacher.py   logits (full or top-k) [+ decoder-layer outputs]
                                                                    of the ORIGINAL model, computed once; the
                                                                    teacher is freed before training
    params  = select_trainables(student, train)        trainable.py routers / routed experts; everything else frozen
              (or LoRA adapters on the routed experts) lora.py      peft, merged back into dense weights at the end
    distill_model(student, targets, config)            run.py       AdamW + schedule (optim.py) on one device,
                                                                    seeded data order (data.py), atomic
                                                                    resumable checkpoints (checkpoint.py)
    loss = T² · KL(p_teacher ‖ q_student) on real tokens [+ w · MSE of decoder-layer outputs]   loss.py

Options and their defaults: `config.py` (`DistillConfig`); the stage: `stages/distill.py`; the plan of the
multi-GPU path and the memory of a 235B model: docs/distillation.md.
"""
