#!/usr/bin/env bash
# CPU demo of the whole pipeline on a small GENERATED dataset (not CIFAR-100): the three stages,
# the students' ONNX export, the report and a tiny study, in about 7 minutes on 2 cores. Its
# numbers show that the code learns and reports; they say nothing about CIFAR-100.
set -euo pipefail
cd "$(dirname "$0")"
DATA=data_demo
OUT=runs/demo
RUN=(--data_dir "$DATA" --no-download --device cpu)
STUDENT=("${RUN[@]}" --epochs 8 --batch_size 16 --lr 0.05)

python -m kd.synthetic --out "$DATA" --train 1000 --test 500
# the teacher from scratch (no ImageNet weights offline), at 32 px
python train_teacher.py --out_dir "$OUT/teacher" --pretrained none --img_size 32 --lr 0.01 \
    --batch_size 32 --warmup_epochs 2 --epochs 8 "${RUN[@]}" --overwrite
python train_student.py --out_dir "$OUT/student_baseline" "${STUDENT[@]}" --overwrite
python distill_student.py --out_dir "$OUT/student_kd" --teacher_ckpt "$OUT/teacher/best.pt" \
    --alpha 0.5 --T 4 "${STUDENT[@]}" --overwrite
# both students as they would be deployed: ONNX fp32 and int8, checked against PyTorch on the
# test images and timed on this CPU; the report adds them to its cost section
for RUN_DIR in "$OUT/student_baseline" "$OUT/student_kd"; do
    python -m kd.export "$RUN_DIR" --int8 --overwrite
done
python plots/plot_runs.py "$OUT/teacher" "$OUT/student_baseline" "$OUT/student_kd" \
    --out "$OUT/plots"
# a tiny study: the CE baseline and kd over two seeds, each holding out 100 training images,
# with the teacher online; its report adds the gain over CE with an interval and a verdict
rm -rf "$OUT/study"
python study.py --out_dir "$OUT/study" --teacher_ckpt "$OUT/teacher/best.pt" \
    --teacher_cache none --seeds 0 1 --val_size 100 --jobs 2 "${STUDENT[@]}"
python plots/plot_runs.py "$OUT/study" --out "$OUT/study/report" --no-cost
cat <<DONE

demo done, on generated data (not CIFAR-100). Where to look:
  $OUT/plots/results.md          the three runs: test top-1 at the best and last epoch, NLL,
                                 calibration, agreement with the teacher, model cost, status,
                                 and each student deployed: PyTorch, ONNX fp32 and int8
  $OUT/student_kd/export/        model.onnx, model_int8.onnx, validation.json
  $OUT/plots/test_top1.png       test top-1 per epoch; train_top1.png, train_ce.png (the
                                 hard-label CE every run logs), train_objective.png, lr.png
  $OUT/plots/reliability.png     calibration of each run; dark_knowledge.png: the teacher's
                                 soft targets
  $OUT/study/report/results.md   the study: kd's gain over CE paired by seed, its 95% interval
                                 and the verdict in words (two seeds: a wide interval)
DONE
