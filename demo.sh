#!/usr/bin/env bash
# CPU demo of the whole pipeline on small GENERATED datasets (not CIFAR-100): the three stages,
# the kd student's ONNX export, the report and a tiny study, in a few minutes on 2 cores. Its
# numbers show that the code learns and reports; they say nothing about CIFAR-100.
set -euo pipefail
cd "$(dirname "$0")"
OUT=runs/demo
STUDY="$OUT/study"
rm -rf "$STUDY"  # the study of an earlier demo: its runs are of another teacher
RUN=(--no-download --device cpu --eval_batch_size 100)  # CPU convs are slower at batch 1000
# the students' settings (small batches: MobileNetV3's BatchNorm statistics, momentum 0.01, need
# some 500 steps to follow the weights); study.py gives its runs the same settings, so it finds
# the two runs of seed 0 below done and adds seed 1
STUDENT=("${RUN[@]}" --data_dir data_demo --epochs 7 --batch_size 8 --lr 0.05 --val_size 100)

# The teacher sees more than its students, as an ImageNet-pretrained teacher does: it trains on
# 4,000 generated images, the students on the first 1,000 of them; one test split for all
python -m kd.synthetic --out data_demo_teacher --train 4000 --test 500
python -m kd.synthetic --out data_demo --train 1000 --test 500
# the teacher from scratch (no ImageNet weights offline), at 32 px
python train_teacher.py --out_dir "$OUT/teacher" --data_dir data_demo_teacher --pretrained none \
    --img_size 32 --lr 0.01 --batch_size 64 --warmup_epochs 1 --epochs 5 "${RUN[@]}" --overwrite
python train_student.py --out_dir "$STUDY/ce/seed0" --seed 0 "${STUDENT[@]}" --overwrite
python distill_student.py --out_dir "$STUDY/kd/seed0" --seed 0 --teacher_ckpt "$OUT/teacher/best.pt" \
    "${STUDENT[@]}" --overwrite
# the kd student as it would be deployed: ONNX fp32 and int8, checked against PyTorch on the
# test images and timed on this CPU; the report adds it to its cost section
python -m kd.export "$STUDY/kd/seed0" --int8 --timed_runs 20 --overwrite
python plots/plot_runs.py "$OUT/teacher" "$STUDY/ce/seed0" "$STUDY/kd/seed0" --out "$OUT/plots"
# a tiny study: the CE baseline and kd over seeds 0 and 1, teacher online; seed 0's runs are the
# two above (done: skipped), seed 1's run one at a time (on 2 cores, two at a time with a thread
# each took longer); its report adds kd's gain over CE paired by seed, an interval, a verdict
python study.py --out_dir "$STUDY" --teacher_ckpt "$OUT/teacher/best.pt" --teacher_cache none \
    --seeds 0 1 "${STUDENT[@]}"
python plots/plot_runs.py "$STUDY" --out "$STUDY/report" --no-cost
cat <<DONE

demo done in $((SECONDS / 60)) min $((SECONDS % 60)) s, on generated data (not CIFAR-100). Where to look:
  $OUT/plots/results.md          the three runs: test top-1 at the best and last epoch, NLL,
                                 calibration, agreement with the teacher, model cost, status,
                                 and the kd student deployed: PyTorch, ONNX fp32 and int8
  $STUDY/kd/seed0/export/    model.onnx, model_int8.onnx, validation.json
  $OUT/plots/test_top1.png       test top-1 per epoch; train_top1.png, train_ce.png (the
                                 hard-label CE every run logs), train_objective.png, lr.png
  $OUT/plots/reliability.png     calibration of each run; dark_knowledge.png: the teacher's
                                 soft targets
  $STUDY/report/results.md   the study: kd's gain over CE paired by seed, its 95% interval
                                 and the verdict in words (two seeds: a wide interval)
DONE
