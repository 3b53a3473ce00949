//! Fine-tuning classifiers (a BERT-family encoder on labelled texts, a ResNet on class
//! folders of images): data, metrics, settings and the training loop. The networks are in
//! `loraloop_model::classify`.

pub mod data;
pub mod metrics;
pub mod run;
pub mod settings;
pub mod worker;

pub use metrics::Metrics;
pub use run::{ClassifyEvent, Outcome, Run, evaluate, train};
pub use settings::ClassifySettings;
