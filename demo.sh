#!/usr/bin/env bash
# CPU demo of the whole pipeline on a small GENERATED dataset (not CIFAR-100): it shows that the
# three stages and the plots run end to end, nothing about real accuracy. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
DATA=data_demo
OUT=runs/demo
RUN=(--data_dir "$DATA" --no-download --device cpu --batch_size 32)
COMMON=("${RUN[@]}" --epochs 5 --overwrite)

python -m kd.synthetic --out "$DATA" --train 1000 --test 500
python train_teacher.py --out_dir "$OUT/teacher" --pretrained none --img_size 32 --lr 0.02 "${COMMON[@]}"
python train_student.py --out_dir "$OUT/student_baseline" --lr 0.1 "${COMMON[@]}"
python distill_student.py --out_dir "$OUT/student_kd" --teacher_ckpt "$OUT/teacher/best.pt" \
    --lr 0.1 --alpha 0.5 --T 4 "${COMMON[@]}"
# the same KD run with the teacher's logits of all 162 views per image cached (built first)
rm -f "$OUT/teacher_cache.pt"
python distill_student.py --out_dir "$OUT/student_kd_cached" --teacher_ckpt "$OUT/teacher/best.pt" \
    --teacher_cache "$OUT/teacher_cache.pt" --lr 0.1 --alpha 0.5 --T 4 "${COMMON[@]}"
python plots/plot_runs.py "$OUT/teacher" "$OUT/student_baseline" "$OUT/student_kd" \
    "$OUT/student_kd_cached" --out "$OUT/plots"
# a tiny study: the CE baseline and two kd points over two seeds (3 epochs), from the cache above,
# picked on 100 held-out images; its report adds the gain table, heatmap and curves
rm -rf "$OUT/study"
python study.py --out_dir "$OUT/study" --teacher_ckpt "$OUT/teacher/best.pt" \
    --teacher_cache "$OUT/teacher_cache.pt" --seeds 0 1 --T 2 4 --val_size 100 --jobs 2 \
    --lr 0.1 --epochs 3 "${RUN[@]}"
python plots/plot_runs.py "$OUT/study" --out "$OUT/study/report" --no-cost
echo "demo done (generated data, not CIFAR-100): reports in $OUT/plots/results.md and" \
    "$OUT/study/report/results.md"
