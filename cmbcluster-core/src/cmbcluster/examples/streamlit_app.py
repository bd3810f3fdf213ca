"""The embedded default's Streamlit example: your home folder and mounted buckets, and a CSV plotted.

Run by the catalog's "Streamlit example" as ``streamlit run streamlit_app.py``; copy it to start
your own app. It works in the environment's home folder, where every mounted bucket is a folder
(``/home/user/data`` is ``~/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

HOME = Path.home()

st.set_page_config(page_title="Streamlit example", layout="wide")
st.title("Streamlit example")
st.caption(f"Environment {os.environ.get('CMBCLUSTER_ENVIRONMENT_ID', '?')}, home folder {HOME}")

folders = sorted(p for p in HOME.iterdir() if p.is_dir() and not p.name.startswith("."))
if not folders:
    st.info("No folder in your home yet: mount a bucket when you launch this application.")
    st.stop()

folder = st.selectbox(
    "Folder", folders, format_func=lambda p: f"~/{p.name}" + (" (a bucket)" if p.is_symlink() else "")
)
files = sorted(p for p in folder.rglob("*") if p.is_file())[:500]
st.write(f"{len(files)} files" + (" (the first 500)" if len(files) == 500 else ""))
st.dataframe([{"file": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files], use_container_width=True)

tables = [p for p in files if p.suffix.lower() == ".csv"]
if tables:
    import pandas as pd  # streamlit depends on pandas

    chosen = st.selectbox("Plot a CSV file", tables, format_func=lambda p: str(p.relative_to(folder)))
    frame = pd.read_csv(chosen)
    st.line_chart(frame.select_dtypes("number"))
    st.dataframe(frame.head(100), use_container_width=True)
