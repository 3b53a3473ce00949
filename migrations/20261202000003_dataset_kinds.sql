-- What a dataset holds: chat examples (sft), preference pairs (dpo: OpenAI's preference
-- lines) or unpaired rated replies (kto: TRL's lines). A job trains by its dataset's kind.
alter table datasets add column kind text not null default 'sft'
    constraint datasets_kind_check check (kind in ('sft', 'dpo', 'kto'));
