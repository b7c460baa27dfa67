"""Draw the README's pictures from a real run: generated shapes embedded by the bundled
imgembed-shapes model through the whole pipeline, then clustered, scored for anomalies and mapped.

    .venv/bin/python docs/make_pictures.py      # writes docs/*.png (about a minute on 2 cores)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgembed.analysis.drawing import draw_map
from imgembed.analysis.maps import project_2d
from imgembed.db import as_array, connect
from imgembed.images.decode import decode_image
from imgembed.local.stack import local_stack
from imgembed.models.registry import register_model
from imgembed.settings import load_settings
from imgembed.training.synthetic import random_shapes

MODEL = "imgembed-shapes"
DOCS = Path(__file__).resolve().parent


def main() -> int:
    settings = load_settings().with_overrides(model=MODEL, data_dir=Path(tempfile.mkdtemp(prefix="imgembed-docs-")))
    shapes = random_shapes(240, seed=5)
    with local_stack(settings, durable=False) as stack, connect(stack.settings.database_url or "") as db:
        register_model(db, MODEL, make_default=True)
        db.execute("CREATE TABLE parts (id integer PRIMARY KEY, photo bytea, kind text, good boolean)")
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO parts VALUES (%s, %s, %s, %s)",
                [(i, s.png_bytes(), f"{s.colour} {s.shape}", s.colour == "red" and s.shape == "circle" and i % 2 == 0)
                 for i, s in enumerate(shapes)])
        db.execute("SELECT imgembed.watch('parts', 'photo', label_column => 'kind', model => %s)", (MODEL,))
        while not db.execute("SELECT embedded = 240 FROM imgembed.status WHERE table_name = 'public.parts'").fetchone()[0]:
            time.sleep(0.5)
        run = db.execute("SELECT imgembed.cluster('parts')").fetchone()[0]
        while db.execute("SELECT status FROM imgembed.cluster_run WHERE id = %s", (run,)).fetchone()[0] not in ("done", "failed"):
            time.sleep(0.5)
        db.execute("SELECT imgembed.set_known_good('parts', good_column => 'good')")
        db.execute("SELECT imgembed.calibrate_anomalies('parts')")
        storage = db.execute("SELECT imgembed.storage_table('parts')").fetchone()[0]
        rows = db.execute(
            f"SELECT p.id, e.embedding, p.photo, p.kind, m.cluster, p.good, a.is_anomaly "
            f"FROM parts p JOIN {storage} e ON e.id = p.id "
            f"JOIN imgembed.cluster_member m ON m.run_id = %s AND m.key = p.id::text "
            f"LEFT JOIN imgembed.anomalies a ON a.table_name = 'public.parts' AND a.key = p.id::text ORDER BY p.id",
            (run,)).fetchall()
        k = db.execute("SELECT k FROM imgembed.cluster_run WHERE id = %s", (run,)).fetchone()[0]
    coordinates = project_2d(np.stack([as_array(row[1]) for row in rows]), "pca")
    thumbnails = [decode_image(bytes(row[2]), settings, 64) for row in rows]
    draw_map(coordinates, thumbnails, [row[3] for row in rows], DOCS / "map-by-label.png", size=900,
             title=f"240 generated images, {MODEL}, PCA, coloured by label")
    draw_map(coordinates, thumbnails, [f"cluster {row[4]}" for row in rows], DOCS / "map-by-cluster.png", size=900,
             title=f"imgembed.cluster('parts'): k={k} chosen by silhouette")
    draw_map(coordinates, thumbnails,
             ["known good (red circle)" if row[5] else ("anomaly" if row[6] else "passes") for row in rows],
             DOCS / "map-by-anomaly.png", size=900,
             title="imgembed.anomalies: good = half the red circles; everything else should be flagged")
    print(f"wrote {', '.join(p.name for p in sorted(DOCS.glob('map-*.png')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
