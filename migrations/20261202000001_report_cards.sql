-- The report card of an adapter (trainer::card::ReportCard as JSON): what it learned and
-- what it kept, with the gate's verdict. Null for uploaded adapters and older jobs.
alter table adapters add column report_card text
    constraint adapters_report_card_json check (report_card is null or json_valid(report_card));
